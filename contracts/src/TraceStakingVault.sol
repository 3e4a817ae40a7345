// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Staking vault for TRACE
/// @notice Stakers lock TRACE in pools the pool manager defines (lock period, minimum position, cap on the
///         pool's total). The vault holds principal only: rewards are paid from the treasury by the platform,
///         so whatever the vault holds always equals the sum of positions and can always be withdrawn once
///         unlocked. A compounder (the platform's treasury) may stake on a staker's behalf with its own TRACE,
///         which is how rewards are compounded into a position.
/// @dev Every state change happens before the token is called (checks-effects-interactions), and every
///      function that moves tokens is also `nonReentrant`.
contract TraceStakingVault is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @dev The small fields share a slot; `pools` returns them in the documented order.
    struct Pool {
        uint64 lockSeconds;
        bool active;
        bool exists;
        uint256 minStake;
    }

    struct Position {
        uint256 amount;
        uint64 unlockAt;
    }

    /// @notice May define and change pools.
    bytes32 public constant POOL_MANAGER_ROLE = keccak256("POOL_MANAGER_ROLE");
    /// @notice May stake its own TRACE into another address's position (`stakeFor`).
    bytes32 public constant COMPOUNDER_ROLE = keccak256("COMPOUNDER_ROLE");

    IERC20 private immutable _token;
    mapping(uint256 poolId => Pool) private _pools;
    mapping(uint256 poolId => mapping(address staker => Position)) private _positions;
    mapping(uint256 poolId => uint256) private _totalStaked;
    /// @dev Zero means no cap.
    mapping(uint256 poolId => uint256) private _caps;

    event PoolSet(uint256 indexed poolId, uint64 lockSeconds, uint256 minStake, bool active);
    event Staked(
        uint256 indexed poolId, address indexed staker, uint256 amount, uint256 newBalance, uint64 unlockAt
    );
    event Unstaked(uint256 indexed poolId, address indexed staker, uint256 amount, uint256 newBalance);
    event PoolCapSet(uint256 indexed poolId, uint256 cap);

    error ZeroAddress();
    error ZeroAmount();
    error UnknownPool(uint256 poolId);
    error PoolInactive(uint256 poolId);
    error BelowMinStake(uint256 poolId, uint256 newBalance, uint256 minStake);
    error StillLocked(uint256 poolId, uint64 unlockAt);
    error AmountExceedsStake(uint256 poolId, uint256 requested, uint256 staked);
    error PoolCapExceeded(uint256 poolId, uint256 newTotal, uint256 cap);
    /// @notice The token moved a different amount than asked (fee-on-transfer or rebasing tokens are refused).
    error TransferAmountMismatch(uint256 expected, uint256 received);

    constructor(IERC20 token_, address admin) {
        if (address(token_) == address(0) || admin == address(0)) revert ZeroAddress();
        _token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(POOL_MANAGER_ROLE, admin);
    }

    /// @notice Creates or changes pool `poolId`. A new lock period applies to later stakes only; a new minimum
    ///         applies to later stakes and unstakes (a position below it can still be withdrawn in full).
    function setPool(uint256 poolId, uint64 lockSeconds, uint256 minStake, bool active)
        external
        onlyRole(POOL_MANAGER_ROLE)
    {
        _setPool(poolId, lockSeconds, minStake, active);
    }

    /// @notice `setPool` plus a cap on the pool's total stake (zero: no cap), in one call. A lower cap refuses
    ///         later stakes only; positions above it stay and can leave.
    function configurePool(uint256 poolId, uint64 lockSeconds, uint256 minStake, uint256 cap, bool active)
        external
        onlyRole(POOL_MANAGER_ROLE)
    {
        _setPool(poolId, lockSeconds, minStake, active);
        _caps[poolId] = cap;
        emit PoolCapSet(poolId, cap);
    }

    function _setPool(uint256 poolId, uint64 lockSeconds, uint256 minStake, bool active) private {
        _pools[poolId] = Pool({lockSeconds: lockSeconds, active: active, exists: true, minStake: minStake});
        emit PoolSet(poolId, lockSeconds, minStake, active);
    }

    /// @notice Adds `amount` (approved beforehand) to the caller's position in pool `poolId` and locks the whole
    ///         position until at least `block.timestamp + lockSeconds`.
    function stake(uint256 poolId, uint256 amount) external nonReentrant {
        _stake(poolId, msg.sender, amount);
    }

    /// @notice Adds `amount` of the caller's TRACE (approved beforehand) to `staker`'s position in pool `poolId`,
    ///         under the same rules as `stake`. Only a compounder may: it is how the platform compounds rewards.
    function stakeFor(uint256 poolId, address staker, uint256 amount)
        external
        nonReentrant
        onlyRole(COMPOUNDER_ROLE)
    {
        if (staker == address(0)) revert ZeroAddress();
        _stake(poolId, staker, amount);
    }

    /// @dev The position is `staker`'s; the tokens come from `msg.sender`.
    function _stake(uint256 poolId, address staker, uint256 amount) private {
        Pool storage pool = _pools[poolId];
        if (!pool.exists) revert UnknownPool(poolId);
        if (!pool.active) revert PoolInactive(poolId);
        if (amount == 0) revert ZeroAmount();
        Position storage position = _positions[poolId][staker];
        uint256 newBalance = position.amount + amount;
        if (newBalance < pool.minStake) revert BelowMinStake(poolId, newBalance, pool.minStake);
        uint256 newTotal = _totalStaked[poolId] + amount;
        uint256 cap = _caps[poolId];
        if (cap != 0 && newTotal > cap) revert PoolCapExceeded(poolId, newTotal, cap);

        // A lock beyond uint64 (a pool meant to lock for good) is clamped rather than wrapped around.
        uint256 lockedUntil = block.timestamp + pool.lockSeconds;
        if (lockedUntil > type(uint64).max) lockedUntil = type(uint64).max;
        uint64 unlockAt = position.unlockAt;
        if (lockedUntil > unlockAt) unlockAt = uint64(lockedUntil);
        position.amount = newBalance;
        position.unlockAt = unlockAt;
        _totalStaked[poolId] = newTotal;
        emit Staked(poolId, staker, amount, newBalance, unlockAt);

        uint256 balanceBefore = _token.balanceOf(address(this));
        _token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = _token.balanceOf(address(this)) - balanceBefore;
        if (received != amount) revert TransferAmountMismatch(amount, received);
    }

    /// @notice Withdraws `amount` of the caller's unlocked position in pool `poolId`; what stays must be
    ///         nothing or at least the pool's minimum. Works for inactive pools too.
    function unstake(uint256 poolId, uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        Position storage position = _positions[poolId][msg.sender];
        uint256 staked = position.amount;
        if (amount > staked) revert AmountExceedsStake(poolId, amount, staked);
        uint64 unlockAt = position.unlockAt;
        if (block.timestamp < unlockAt) revert StillLocked(poolId, unlockAt);
        uint256 newBalance = staked - amount;
        uint256 minStake = _pools[poolId].minStake;
        if (newBalance != 0 && newBalance < minStake) revert BelowMinStake(poolId, newBalance, minStake);

        if (newBalance == 0) {
            delete _positions[poolId][msg.sender];
        } else {
            position.amount = newBalance;
        }
        _totalStaked[poolId] -= amount;
        emit Unstaked(poolId, msg.sender, amount, newBalance);

        _token.safeTransfer(msg.sender, amount);
    }

    /// @notice Pool `poolId` field by field; all zero when it was never set.
    function pools(uint256 poolId)
        external
        view
        returns (uint64 lockSeconds, uint256 minStake, bool active, bool exists)
    {
        Pool storage pool = _pools[poolId];
        return (pool.lockSeconds, pool.minStake, pool.active, pool.exists);
    }

    /// @notice The position of `staker` in pool `poolId`.
    function positions(uint256 poolId, address staker) external view returns (uint256 amount, uint64 unlockAt) {
        Position storage position = _positions[poolId][staker];
        return (position.amount, position.unlockAt);
    }

    /// @notice The cap on pool `poolId`'s total stake; zero when it has none.
    function poolCap(uint256 poolId) external view returns (uint256) {
        return _caps[poolId];
    }

    /// @notice The sum of all positions in pool `poolId`.
    function totalStaked(uint256 poolId) external view returns (uint256) {
        return _totalStaked[poolId];
    }

    function token() external view returns (IERC20) {
        return _token;
    }
}
